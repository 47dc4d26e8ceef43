"""slicefm.tracking"""
