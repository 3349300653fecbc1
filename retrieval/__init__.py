"""Distributed batch pipeline for billion-scale image gallery indexing and copy detection."""
__version__ = "0.1.0"
