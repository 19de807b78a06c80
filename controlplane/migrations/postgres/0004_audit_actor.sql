-- One user's (or bot's, or node's) events over a time range: `gctl events --actor NAME`.
CREATE INDEX audit_events_actor_time ON audit_events (actor, time_nanos);
