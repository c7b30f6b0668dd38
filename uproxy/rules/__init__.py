"""Kernel rules that steer service traffic to uproxy's listeners."""
