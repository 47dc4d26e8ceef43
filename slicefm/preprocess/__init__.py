"""slicefm.preprocess"""
