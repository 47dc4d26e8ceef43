"""slicefm.models"""
