"""The one-thread step: intake at the edge, scheduling, the step as frozen data, commit,
request streams, admin commands, and the follower of the registry's change feed."""
