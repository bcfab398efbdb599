"""PLC I/O: the tag table, the site file, the process image and the transports to the PLC."""
