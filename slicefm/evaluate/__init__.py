"""slicefm.evaluate"""
