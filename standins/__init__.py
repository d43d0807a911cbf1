"""Local stand-ins for Microsoft Graph, the managed identity endpoint and Service Bus.

They serve the tests, the benchmarks and the local demo. They are test equipment beside the
function's package, not part of it: ``upgrade_handler`` never imports them (only its command
line's ``demo``, when it runs), and ``.funcignore`` leaves them out of what is deployed.

- :mod:`.graph_simulator`: Microsoft Graph over HTTP; its tenant (:mod:`.graph_tenant`), request
  semantics (:mod:`.graph_requests`), responses (:mod:`.graph_responses`) and fault knobs
  (:mod:`.graph_faults`);
- :mod:`.identity_endpoint`: the App Service / Functions managed identity token endpoint;
- :mod:`.servicebus_broker`: Service Bus over AMQP 1.0; its link handling
  (:mod:`.servicebus_links`), queues (:mod:`.servicebus_store`) and message encoding
  (:mod:`.amqp_codec`).
"""
