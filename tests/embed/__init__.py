"""tests.embed"""
