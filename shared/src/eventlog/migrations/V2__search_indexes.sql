-- The searches of GET /events, each answered from an index, newest first by seq.
CREATE INDEX event_log_events_seq ON event_log_events (seq);
CREATE INDEX event_log_events_instance ON event_log_events (instance_id, seq);
CREATE INDEX event_log_events_store ON event_log_events (store_id, seq);
CREATE INDEX event_log_events_object ON event_log_events (object_id, seq);
CREATE INDEX event_log_events_ecwid_event ON event_log_events (ecwid_event_id);
