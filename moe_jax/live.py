"""Live routing metrics of a running training, served in Prometheus text format.

With `train.metrics_port` > 0 the chief process serves http://HOST:PORT/metrics
(`train.metrics_host`, loopback by default; 0.0.0.0 lets a cluster's Prometheus scrape it) through
the official client; every log step refreshes the gauges (per-expert load per layer, MaxVio,
entropy, dropped fraction, loss, step). Point Prometheus or `curl` at it.
"""

from prometheus_client import CollectorRegistry, Gauge, start_http_server


class LiveRoutingMetrics:

  def __init__(self, port: int, address: str = "127.0.0.1"):
    self.registry = CollectorRegistry()
    gauge = lambda name, doc, labels=(): Gauge(name, doc, labels, registry=self.registry)
    self.step = gauge("moe_train_step", "Last logged training step.")
    self.loss = gauge("moe_train_loss", "Training loss over the last log window.")
    self.load = gauge("moe_expert_load", "Share of routed assignments per expert.", ("layer", "expert"))
    self.max_violation = gauge("moe_max_violation", "Mean MaxVio per batch.", ("layer",))
    self.entropy = gauge("moe_router_entropy", "Mean router entropy per token (nats).", ("layer",))
    self.dropped = gauge("moe_dropped_fraction", "Share of assignments dropped.", ("layer",))
    self.server, self.thread = start_http_server(port, addr=address, registry=self.registry)

  def update(self, step: int, scalars: dict[str, float], loads_LxE) -> None:
    self.step.set(step)
    self.loss.set(scalars["loss"])
    for layer, loads in enumerate(loads_LxE):
      for expert, share in enumerate(loads):
        self.load.labels(str(layer), str(expert)).set(share)
      for gauge, name in ((self.max_violation, "max_violation"), (self.entropy, "entropy"),
                          (self.dropped, "dropped_fraction")):
        gauge.labels(str(layer)).set(scalars[f"routing/layer{layer}/{name}"])

  def close(self) -> None:
    self.server.shutdown()
    self.server.server_close()
