"""Jobs on a remote Ray cluster: the Jobs API client (`client`) and the cluster-side entrypoint (`entrypoint`)."""
