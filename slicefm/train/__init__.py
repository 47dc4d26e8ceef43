"""slicefm.train"""
