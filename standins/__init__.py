"""Local stand-ins for Microsoft Graph, the managed identity endpoint and Service Bus.

They serve the tests, the benchmarks and the local demo; the function never imports them.
"""
