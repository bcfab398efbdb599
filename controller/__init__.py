"""The supervisory application: decision core, scan loop, BMS server, commissioning and CLI."""
