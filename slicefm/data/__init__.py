"""slicefm.data"""
