"""slicefm.embed"""
