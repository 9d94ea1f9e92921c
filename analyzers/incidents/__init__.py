"""Incidents with known causes, simulated: the test bed the diagnosis rules are judged on.

`simulator.simulate(settings)` models a serving system; `catalogue.INCIDENTS`
names incidents, each a function of (seed, size) returning settings whose
planted cause is known; `output` writes a run directory or a production-style
request log of a simulation.
"""
