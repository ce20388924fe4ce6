"""Test doubles that implement the same interfaces as the real parts, for
unit tests of logic that must not boot a guest."""
