"""slicefm.ssl"""
