"""Test helpers shared by the services: real Redis servers, started and stopped by the tests."""
