"""Command automaton, sampling, the jitted relay decoder, and its eager reference."""
