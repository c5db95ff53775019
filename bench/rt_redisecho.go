package main

// The system under test: the example app's realtime endpoint (Echo,
// redisecho Hub, SSEWithConfig on /events?channels=...), each server and
// the publisher with a rueidis client of its own.

import (
	"context"
	"time"

	"github.com/redis/rueidis"
	"github.com/redisecho/redisecho"
)

func init() {
	serverKinds["redisecho"] = newRedisechoServer
	publisherKinds["redisecho"] = newRedisechoPublisher
}

// newHub is a hub with its defaults (MaxLen 1000, HistoryTTL 1h, ...) on
// a client of its own.
func newHub(cfg serverConfig) (*redisecho.Hub, rueidis.Client, error) {
	client, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{cfg.Redis}})
	if err != nil {
		return nil, nil, err
	}
	hub, err := redisecho.NewHub(redisecho.HubConfig{Client: client, Options: redisecho.Options{Prefix: cfg.Prefix}})
	if err != nil {
		client.Close()
		return nil, nil, err
	}
	return hub, client, nil
}

func newRedisechoServer(cfg serverConfig) (*serverApp, error) {
	hub, client, err := newHub(cfg)
	if err != nil {
		return nil, err
	}
	e := newEcho()
	e.GET("/events", redisecho.SSEWithConfig(redisecho.SSEConfig{Hub: hub}))
	return &serverApp{
		Handler:  e,
		Stats:    func() any { return hub.Stats() },
		Shutdown: hub.Shutdown,
		Close:    client.Close,
		Timeouts: true,
	}, nil
}

func newRedisechoPublisher(cfg serverConfig) (publishFunc, func(), error) {
	hub, client, err := newHub(cfg)
	if err != nil {
		return nil, nil, err
	}
	publish := func(ctx context.Context, channel string, payload []byte) error {
		_, err := hub.Publish(ctx, channel, redisecho.Event{Name: "chat:message", Data: payload})
		return err
	}
	release := func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = hub.Shutdown(ctx)
		client.Close()
	}
	return publish, release, nil
}
