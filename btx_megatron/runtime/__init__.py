"""Distributed start-up and the CPU compatibility layer."""
