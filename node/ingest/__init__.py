"""Ingest: sensor messages in, validated windows out to the inference queue."""
