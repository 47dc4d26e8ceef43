"""slicefm.io"""
