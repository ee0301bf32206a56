"""The Kafka service: consumes OpenAI Batch jobs, runs them on the engine, publishes results."""
