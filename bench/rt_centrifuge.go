package main

// The peer: centrifugal/centrifuge with its Redis broker (history and
// recovery on, the same size and TTL as the hub's defaults), the JSON
// protocol over WebSocket (the only transport centrifuge-go speaks).

import (
	"context"
	"net/http"
	"time"

	"github.com/centrifugal/centrifuge"
)

// The history every centrifuge publish keeps: the hub's defaults (MaxLen
// 1000, HistoryTTL 1h, MetaTTL 24h).
const (
	centrifugeHistorySize = 1000
	centrifugeHistoryTTL  = time.Hour
	centrifugeMetaTTL     = 24 * time.Hour
)

func init() { serverKinds["centrifuge"] = newCentrifugeServer }

// newCentrifugeNode is a running node on the Redis broker with prefix.
func newCentrifugeNode(cfg serverConfig) (*centrifuge.Node, error) {
	node, err := centrifuge.New(centrifuge.Config{LogLevel: centrifuge.LogLevelError, LogHandler: func(e centrifuge.LogEntry) {
		logf("centrifuge: %s %v", e.Message, e.Fields)
	}, HistoryMetaTTL: centrifugeMetaTTL})
	if err != nil {
		return nil, err
	}
	shard, err := centrifuge.NewRedisShard(node, centrifuge.RedisShardConfig{Address: cfg.Redis})
	if err != nil {
		return nil, err
	}
	broker, err := centrifuge.NewRedisBroker(node, centrifuge.RedisBrokerConfig{Prefix: cfg.Prefix + "centrifuge", Shards: []*centrifuge.RedisShard{shard}})
	if err != nil {
		return nil, err
	}
	node.SetBroker(broker)
	if err := node.Run(); err != nil {
		return nil, err
	}
	return node, nil
}

// newCentrifugeServer: anonymous connections, every subscription allowed
// with recovery on (positions tracked, missed publications recovered from
// the stream on resubscribe).
func newCentrifugeServer(cfg serverConfig) (*serverApp, error) {
	node, err := newCentrifugeNode(cfg)
	if err != nil {
		return nil, err
	}
	node.OnConnecting(func(context.Context, centrifuge.ConnectEvent) (centrifuge.ConnectReply, error) {
		return centrifuge.ConnectReply{Credentials: &centrifuge.Credentials{UserID: ""}}, nil
	})
	node.OnConnect(func(client *centrifuge.Client) {
		client.OnSubscribe(func(_ centrifuge.SubscribeEvent, cb centrifuge.SubscribeCallback) {
			cb(centrifuge.SubscribeReply{Options: centrifuge.SubscribeOptions{EnableRecovery: true}}, nil)
		})
	})
	mux := http.NewServeMux()
	mux.Handle("/connection/websocket", centrifuge.NewWebsocketHandler(node, centrifuge.WebsocketConfig{}))
	return &serverApp{
		Handler:  mux,
		Shutdown: node.Shutdown,
	}, nil
}

func init() { publisherKinds["centrifuge"] = newCentrifugePublisher }

// newCentrifugePublisher publishes through a node of its own on the same
// broker, keeping history as the hub does.
func newCentrifugePublisher(cfg serverConfig) (publishFunc, func(), error) {
	node, err := newCentrifugeNode(cfg)
	if err != nil {
		return nil, nil, err
	}
	publish := func(_ context.Context, channel string, payload []byte) error {
		_, err := node.Publish(channel, payload, centrifuge.WithHistory(centrifugeHistorySize, centrifugeHistoryTTL, centrifugeMetaTTL))
		return err
	}
	release := func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = node.Shutdown(ctx)
	}
	return publish, release, nil
}
