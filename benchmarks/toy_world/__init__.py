"""Toy text-to-image world for the masked-vs-vanilla DreamBooth leakage benchmark (issue 13); see README.md."""
