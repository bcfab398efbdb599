"""Metering and heat-loop availability, pure (docs/metering.md)."""
