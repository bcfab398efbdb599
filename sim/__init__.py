"""The simulated plant: a pure model of the demo site, its faults and scenarios, and its PLC."""
