"""Model definitions: plain torch that reads like single-device code."""
