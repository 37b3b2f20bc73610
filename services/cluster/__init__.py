"""Running stageserve's services as processes on one machine: `stageserve serve ROLE` for one,
`stageserve up` for a whole deployment (see supervisor.py for how children are started and stopped)."""
