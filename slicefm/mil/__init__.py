"""slicefm.mil"""
