package processor

import (
	"cmp"
	"encoding/binary"
	"math"
	"slices"

	"github.com/segmentio/kafka-go"
)

// StickyBalancer is a kafka-go GroupBalancer that keeps entity-partitions
// with the member whose store holds their freshest state, so that a
// rebalance moves as little state as it can (docs/scaling.md).
//
// An entity-partition p is partition p of every consumed topic: all of them
// go to the same member, because an entity's state is keyed by p whatever
// topic its events come from. Each member's join metadata lists the
// entity-partitions its store holds with their sequence number (the count
// of accepted markers the state includes). The leader then assigns:
//
//  1. each member a quota of ⌊P/N⌋ or ⌈P/N⌉ partitions (the larger quotas
//     to the members holding the most freshest copies);
//  2. held partitions to their freshest holder with quota left, the
//     partitions whose second-best copy is stalest (or missing) first;
//  3. the rest, in order, to the first members below their quota.
//
// The result depends only on the members and their metadata, so every
// leader computes the same assignment.
type StickyBalancer struct {
	// Holdings returns the entity-partitions the local store holds, with
	// their sequence numbers. nil means none.
	Holdings func() map[int]int64
}

// stickyProtocol is the balancer's protocol name in the group.
const stickyProtocol = "funnelwatch-sticky"

// ProtocolName implements kafka.GroupBalancer.
func (StickyBalancer) ProtocolName() string { return stickyProtocol }

// UserData implements kafka.GroupBalancer: the local holdings.
func (b StickyBalancer) UserData() ([]byte, error) {
	var h map[int]int64
	if b.Holdings != nil {
		h = b.Holdings()
	}
	return encodeHoldings(h), nil
}

// encodeHoldings encodes holdings in partition order: a version byte, then
// (partition, seq) pairs as uvarints.
func encodeHoldings(h map[int]int64) []byte {
	parts := make([]int, 0, len(h))
	for p := range h {
		parts = append(parts, p)
	}
	slices.Sort(parts)
	out := []byte{1}
	for _, p := range parts {
		out = binary.AppendUvarint(out, uint64(p))
		out = binary.AppendUvarint(out, uint64(max(h[p], 0)))
	}
	return out
}

// decodeHoldings decodes what encodeHoldings made; metadata it cannot read
// (another version, another balancer) counts as holding nothing.
func decodeHoldings(b []byte) map[int]int64 {
	h := map[int]int64{}
	if len(b) == 0 || b[0] != 1 {
		return h
	}
	b = b[1:]
	for len(b) > 0 {
		p, n := binary.Uvarint(b)
		if n <= 0 {
			return map[int]int64{}
		}
		b = b[n:]
		seq, n := binary.Uvarint(b)
		if n <= 0 {
			return map[int]int64{}
		}
		b = b[n:]
		h[int(p)] = int64(seq)
	}
	return h
}

// AssignGroups implements kafka.GroupBalancer.
func (StickyBalancer) AssignGroups(members []kafka.GroupMember, partitions []kafka.Partition) kafka.GroupMemberAssignments {
	out := kafka.GroupMemberAssignments{}
	if len(members) == 0 {
		return out
	}
	members = slices.Clone(members)
	slices.SortFunc(members, func(a, b kafka.GroupMember) int { return cmp.Compare(a.ID, b.ID) })
	topicsOf := map[int][]string{}
	for _, pa := range partitions {
		if !slices.Contains(topicsOf[pa.ID], pa.Topic) {
			topicsOf[pa.ID] = append(topicsOf[pa.ID], pa.Topic)
		}
	}
	ids := make([]int, 0, len(topicsOf))
	for id := range topicsOf {
		ids = append(ids, id)
	}
	slices.Sort(ids)

	holdings := make([]map[int]int64, len(members))
	freshest := map[int]int64{}
	holders := map[int]int{}
	for i, m := range members {
		holdings[i] = decodeHoldings(m.UserData)
		for p, seq := range holdings[i] {
			if _, ok := topicsOf[p]; !ok {
				continue
			}
			holders[p]++
			if f, ok := freshest[p]; !ok || seq > f {
				freshest[p] = seq
			}
		}
	}

	// Quotas: the members holding the most freshest copies get the
	// larger ones, so that they keep what they hold.
	fresh := make([]int, len(members))
	for i, h := range holdings {
		for p, seq := range h {
			if f, ok := freshest[p]; ok && seq == f {
				fresh[i]++
			}
		}
	}
	order := make([]int, len(members))
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(a, b int) int { return cmp.Compare(fresh[b], fresh[a]) })
	quota := make([]int, len(members))
	for rank, i := range order {
		quota[i] = len(ids) / len(members)
		if rank < len(ids)%len(members) {
			quota[i]++
		}
	}

	// Holders of each partition, freshest first; partitions are placed in
	// order of regret (how much staler the second-best copy is), so that a
	// member keeps the partitions nobody else could take over cheaply.
	type claim struct {
		m     int
		stale int64
	}
	claims := map[int][]claim{}
	for i, h := range holdings {
		for p, seq := range h {
			if _, ok := topicsOf[p]; ok {
				claims[p] = append(claims[p], claim{m: i, stale: freshest[p] - seq})
			}
		}
	}
	regret := map[int]int64{}
	var held []int
	for p, cs := range claims {
		slices.SortFunc(cs, func(a, b claim) int { return cmp.Or(cmp.Compare(a.stale, b.stale), cmp.Compare(a.m, b.m)) })
		regret[p] = math.MaxInt64
		if len(cs) > 1 {
			regret[p] = cs[1].stale - cs[0].stale
		}
		held = append(held, p)
	}
	slices.SortFunc(held, func(a, b int) int { return cmp.Or(cmp.Compare(regret[b], regret[a]), cmp.Compare(a, b)) })
	owner := map[int]int{}
	load := make([]int, len(members))
	for _, p := range held {
		for _, c := range claims[p] {
			if load[c.m] < quota[c.m] {
				owner[p] = c.m
				load[c.m]++
				break
			}
		}
	}
	for _, p := range ids {
		if _, taken := owner[p]; taken {
			continue
		}
		best := -1
		for i := range members {
			if load[i] >= quota[i] {
				continue
			}
			best = i
			break
		}
		owner[p] = best
		load[best]++
	}

	for _, m := range members {
		out[m.ID] = map[string][]int{}
	}
	for _, p := range ids {
		m := members[owner[p]]
		for _, topic := range topicsOf[p] {
			if len(m.Topics) > 0 && !slices.Contains(m.Topics, topic) {
				continue
			}
			out[m.ID][topic] = append(out[m.ID][topic], p)
		}
	}
	return out
}
