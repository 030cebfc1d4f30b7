"""The stream agent: runs one operation between two streams on RabbitMQ."""
