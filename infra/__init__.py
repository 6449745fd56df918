"""Infrastructure: settings, embedded broker and Redis, Kafka/Redis I/O, CLI and supervisor."""
