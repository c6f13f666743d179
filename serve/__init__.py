"""The motionserve Ray Serve application.

Ray's own package is always imported as `from ray import serve`.
"""
