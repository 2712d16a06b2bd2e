"""Measurement: where the numbers come from (device), how they are taken (timing, memory, FLOPs), where they live."""
