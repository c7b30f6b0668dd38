"""The command line: `uproxy` (run the proxy, or --cleanup), `uproxy explain`,
`uproxy demo`. `uproxy.cli` builds the parser from these modules and
dispatches; `arguments` holds what they share: the one-line UsageError, the
typed flag values and the run flags (the demo takes most of them too)."""
