"""The hard safety layer: sensor validation, interlock rules as data, latches."""
