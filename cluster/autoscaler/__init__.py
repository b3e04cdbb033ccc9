"""kvtide.cluster.autoscaler: reshapes the fleet for the traffic season. Its policies are pure
functions from an observation to a target; the control loop acts through Ray."""
