package main

// GET /metrics: every redisecho feature reports through the OpenTelemetry
// bridge module (github.com/redisecho/redisecho/otel), whose meter provider
// exports to a Prometheus registry of this app's own (never the otel.Set*
// globals or prometheus.DefaultRegisterer: the tests run several apps in
// one process). The registry also holds the Go runtime and process
// collectors. Everything it serves is in process memory but the queue
// depth, which the bridge reads from Redis at each scrape under a 500 ms
// deadline and leaves out when Redis does not answer: /metrics answers
// while Redis is down.
//
// The route is public here, like the rest of the demo; in production serve
// it on an internal listener or behind the scraper's credentials.

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/labstack/echo/v4"

	otelredisecho "github.com/redisecho/redisecho/otel"
)

// metrics is the app's meter provider, its registry and the observer that
// every feature reports to.
type metrics struct {
	obs      *otelredisecho.Observer
	provider *sdkmetric.MeterProvider
	handler  http.Handler
}

// newMetrics builds them. It does no I/O.
func newMetrics() (*metrics, error) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	exp, err := otelprom.New(otelprom.WithRegisterer(reg), otelprom.WithoutScopeInfo())
	if err != nil {
		return nil, err
	}
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exp))
	// Spans go nowhere in the demo: give the bridge an SDK tracer provider
	// with an exporter (OTLP, say) to record them.
	obs, err := otelredisecho.New(otelredisecho.Config{MeterProvider: mp, TracerProvider: noop.NewTracerProvider()})
	if err != nil {
		return nil, err
	}
	return &metrics{obs: obs, provider: mp, handler: promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})}, nil
}

// mount serves the registry at GET /metrics.
func (m *metrics) mount(e *echo.Echo) {
	e.GET("/metrics", echo.WrapHandler(m.handler))
}
