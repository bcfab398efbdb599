"""Hardware-in-the-loop tests: real loopback sockets between clients and the simulated PLC."""
