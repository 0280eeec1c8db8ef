"""Conformance zoo: tiny random-weight ``transformers`` models for many architectures."""
