"""Thin DVC stage entry points: parse params, call the library, write declared outputs."""
