package processor_test

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"
	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/funnelwatch/funnelwatch/processor"
)

// member builds a group member whose metadata says it holds h.
func member(t *testing.T, id string, h map[int]int64) kafka.GroupMember {
	t.Helper()
	ud, err := processor.StickyBalancer{Holdings: func() map[int]int64 { return h }}.UserData()
	if err != nil {
		t.Fatal(err)
	}
	return kafka.GroupMember{ID: id, Topics: []string{"events", "deals"}, UserData: ud}
}

func partitionsOf(n int, topics ...string) []kafka.Partition {
	var out []kafka.Partition
	for _, topic := range topics {
		for i := range n {
			out = append(out, kafka.Partition{Topic: topic, ID: i})
		}
	}
	return out
}

func TestStickyBalancer(t *testing.T) {
	tests := []struct {
		name    string
		members map[string]map[int]int64
		parts   int
		want    map[string][]int
	}{
		{
			name:    "fresh start spreads evenly",
			members: map[string]map[int]int64{"a": nil, "b": nil, "c": nil},
			parts:   6,
			want:    map[string][]int{"a": {0, 1}, "b": {2, 3}, "c": {4, 5}},
		},
		{
			name: "restart keeps what each member holds",
			members: map[string]map[int]int64{
				"a":  {0: 7, 4: 9},
				"b2": {1: 3, 3: 5}, // b restarted with a new member id
				"c":  {2: 8, 5: 1},
			},
			parts: 6,
			want:  map[string][]int{"a": {0, 4}, "b2": {1, 3}, "c": {2, 5}},
		},
		{
			name: "restart after a short takeover goes back to the older copy",
			members: map[string]map[int]int64{
				// a took b's partitions 1 and 3 while b was away: a holds
				// them fresher, but its quota is 2 and its own are fresh.
				"a":  {0: 7, 2: 9, 1: 4, 3: 6},
				"b2": {1: 3, 3: 5},
			},
			parts: 4,
			want:  map[string][]int{"a": {0, 2}, "b2": {1, 3}},
		},
		{
			name: "equal copies: the partitions only one member holds stay with it",
			members: map[string]map[int]int64{
				"a": {0: 0, 1: 0, 2: 0, 3: 0},
				"b": {2: 0, 3: 0},
			},
			parts: 4,
			want:  map[string][]int{"a": {0, 1}, "b": {2, 3}},
		},
		{
			name: "scale up moves only the surplus",
			members: map[string]map[int]int64{
				"a": {0: 1, 1: 1, 2: 1},
				"b": {3: 1, 4: 1, 5: 1},
				"c": nil,
			},
			parts: 6,
			want:  map[string][]int{"a": {0, 1}, "b": {3, 4}, "c": {2, 5}},
		},
		{
			name: "scale down gives the leaver's partitions to the others",
			members: map[string]map[int]int64{
				"a": {0: 1, 1: 1},
				"b": {2: 1, 3: 1},
			},
			parts: 6,
			want:  map[string][]int{"a": {0, 1, 4}, "b": {2, 3, 5}},
		},
		{
			name: "the freshest holder wins over a stale one",
			members: map[string]map[int]int64{
				"a": {0: 10},
				"b": {0: 3},
			},
			parts: 2,
			want:  map[string][]int{"a": {0}, "b": {1}},
		},
		{
			name: "more members than partitions leaves some idle",
			members: map[string]map[int]int64{
				"a": {0: 1}, "b": nil, "c": {1: 1},
			},
			parts: 2,
			want:  map[string][]int{"a": {0}, "b": nil, "c": {1}},
		},
		{
			name:    "metadata of another balancer counts as nothing",
			members: map[string]map[int]int64{"a": nil, "b": nil},
			parts:   3,
			want:    map[string][]int{"a": {0, 1}, "b": {2}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var members []kafka.GroupMember
			for _, id := range slices.Sorted(maps.Keys(tt.members)) {
				members = append(members, member(t, id, tt.members[id]))
			}
			got := processor.StickyBalancer{}.AssignGroups(members, partitionsOf(tt.parts, "events", "deals"))
			for id, want := range tt.want {
				a := got[id]
				if a == nil {
					t.Fatalf("member %s: no assignment; got %v", id, got)
				}
				ev, de := slices.Sorted(slices.Values(a["events"])), slices.Sorted(slices.Values(a["deals"]))
				if !slices.Equal(ev, want) || !slices.Equal(de, want) {
					t.Errorf("member %s: got events %v deals %v; want %v for both", id, ev, de, want)
				}
			}
			// Deterministic: the same input in another order gives the same.
			slices.Reverse(members)
			again := processor.StickyBalancer{}.AssignGroups(members, partitionsOf(tt.parts, "events", "deals"))
			if fmt.Sprint(again) != fmt.Sprint(got) {
				t.Errorf("member order changed the assignment: got %v; want %v", again, got)
			}
		})
	}
}

// progress stands for the sequence numbers of the markers members make.
var progress atomic.Int64

// groupMember runs a kafka-go consumer group member with the sticky
// balancer and reports each generation's assignment of topic "events".
type groupMember struct {
	cg   *kafka.ConsumerGroup
	mu   sync.Mutex
	held map[int]int64
	gens chan []int
}

func joinGroup(t *testing.T, brokers []string, held map[int]int64) *groupMember {
	t.Helper()
	m := &groupMember{held: maps.Clone(held), gens: make(chan []int, 16)}
	if m.held == nil {
		m.held = map[int]int64{}
	}
	cg, err := kafka.NewConsumerGroup(kafka.ConsumerGroupConfig{
		ID:                "sticky",
		Brokers:           brokers,
		Topics:            []string{"events", "deals"},
		GroupBalancers:    []kafka.GroupBalancer{processor.StickyBalancer{Holdings: m.holdings}},
		HeartbeatInterval: 100 * time.Millisecond,
		SessionTimeout:    time.Second,
		RebalanceTimeout:  time.Second,
		JoinGroupBackoff:  100 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	m.cg = cg
	go func() {
		for {
			gen, err := cg.Next(context.Background())
			if err != nil {
				close(m.gens)
				return
			}
			got := slices.Sorted(slices.Values(partitionIDs(gen.Assignments["events"])))
			m.mu.Lock()
			// The store of a member holds the state of what it consumed,
			// as fresh as the progress it made: a global counter here.
			for _, p := range got {
				m.held[p] = progress.Add(1)
			}
			m.mu.Unlock()
			m.gens <- got
		}
	}()
	return m
}

func partitionIDs(pa []kafka.PartitionAssignment) []int {
	out := make([]int, 0, len(pa))
	for _, a := range pa {
		out = append(out, a.ID)
	}
	return out
}

func (m *groupMember) holdings() map[int]int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return maps.Clone(m.held)
}

// settle waits until the members' latest assignments cover n partitions
// without overlap and no new generation came for a while, and returns them.
func settle(t *testing.T, n int, members ...*groupMember) [][]int {
	t.Helper()
	latest := make([][]int, len(members))
	deadline := time.After(30 * time.Second)
	quiet := time.Now()
	for {
		for i, m := range members {
			select {
			case g := <-m.gens:
				latest[i], quiet = g, time.Now()
			default:
			}
		}
		var all []int
		for _, l := range latest {
			all = append(all, l...)
		}
		slices.Sort(all)
		if len(all) == n && len(slices.Compact(all)) == n && time.Since(quiet) > 1500*time.Millisecond {
			return latest
		}
		select {
		case <-deadline:
			t.Fatalf("assignments did not settle: %v", latest)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// TestStickyBalancerRollingRestart restarts a member of a real group (kfake)
// and checks that every member ends with the partitions it had.
func TestStickyBalancerRollingRestart(t *testing.T) {
	brokers := startBroker(t, kfake.SeedTopics(4, "events", "deals"), kfake.GroupMinSessionTimeout(100*time.Millisecond))
	// One member at a time: kafka-go members joining a new group at the
	// same instant sometimes wait out a whole rebalance timeout.
	a := joinGroup(t, brokers, nil)
	settle(t, 4, a)
	b := joinGroup(t, brokers, nil)
	before := settle(t, 4, a, b)
	if len(before[0]) != 2 || len(before[1]) != 2 {
		t.Fatalf("got assignments %v; want 2 partitions each", before)
	}
	// b stops (leaving the group: a takes everything meanwhile) and comes
	// back with a new member id and the holdings of its store.
	held := b.holdings()
	b.cg.Close()
	settle(t, 4, a)
	b2 := joinGroup(t, brokers, held)
	defer b2.cg.Close()
	defer a.cg.Close()
	after := settle(t, 4, a, b2)
	if !slices.Equal(after[0], before[0]) || !slices.Equal(after[1], before[1]) {
		t.Errorf("got assignments %v after the restart; want %v", after, before)
	}
}
