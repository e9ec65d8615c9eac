//! Coalesced acknowledgements. The broker counts every `basic.ack` frame as work, and one
//! `ack` with `multiple` set settles every delivery up to its tag. Deliveries finish out of
//! order across the worker threads, so a delivery that may be acked waits while an earlier
//! one is still in flight; once the earlier ones are settled, a single `ack multiple` covers
//! the whole run of them. A slow delivery holds back at most `max_held` others (at least
//! one): beyond that they are acked one by one, so the prefetch window never fills with
//! finished work.

use std::collections::BTreeMap;

/// An acknowledgement to send now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ack<D> {
    /// Ack this delivery alone.
    Single(D),
    /// Ack this delivery and every earlier one still unacked on the channel.
    Multiple(D),
}

/// The deliveries of one channel that are not settled yet, by delivery tag.
pub(crate) struct AckBook<D> {
    /// `None` while in flight; the delivery once it may be acked.
    open: BTreeMap<u64, Option<D>>,
    held: usize,
    max_held: usize,
}

impl<D> AckBook<D> {
    /// A book that holds back at most `max_held` finished deliveries.
    pub(crate) fn new(max_held: usize) -> Self {
        AckBook {
            open: BTreeMap::new(),
            held: 0,
            max_held: max_held.max(1),
        }
    }

    /// How many deliveries are handed out and not finished yet.
    pub(crate) fn in_flight(&self) -> usize {
        self.open.len() - self.held
    }

    /// A delivery was handed to a worker.
    pub(crate) fn delivered(&mut self, tag: u64) {
        self.open.insert(tag, None);
    }

    /// A delivery may be acked: the acks to send now (possibly none, possibly covering
    /// earlier deliveries too).
    pub(crate) fn ready(&mut self, tag: u64, delivery: D) -> Vec<Ack<D>> {
        if let Some(slot) = self.open.get_mut(&tag) {
            if slot.is_none() {
                self.held += 1;
            }
            *slot = Some(delivery);
        } else {
            // Not tracked (cannot happen): ack it alone rather than lose it.
            return vec![Ack::Single(delivery)];
        }
        self.flush()
    }

    /// A delivery was settled otherwise (nacked): forget it; the acks it was holding back.
    pub(crate) fn settled_otherwise(&mut self, tag: u64) -> Vec<Ack<D>> {
        if let Some(Some(_)) = self.open.remove(&tag) {
            self.held -= 1;
        }
        self.flush()
    }

    /// Takes every ready delivery (to ack one by one when the session ends while earlier
    /// ones are still in flight).
    pub(crate) fn take_ready(&mut self) -> Vec<D> {
        let tags: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, d)| d.is_some())
            .map(|(&tag, _)| tag)
            .collect();
        let ready: Vec<D> = tags
            .into_iter()
            .filter_map(|tag| self.open.remove(&tag).flatten())
            .collect();
        self.held -= ready.len();
        ready
    }

    /// Acks the run of ready deliveries at the front with one frame; then, if too many are
    /// still held back, acks the excess one by one.
    fn flush(&mut self) -> Vec<Ack<D>> {
        let mut acks = Vec::new();
        let mut front = None;
        let mut count = 0;
        while let Some(entry) = self.open.first_entry() {
            if entry.get().is_none() {
                break;
            }
            front = entry.remove();
            count += 1;
        }
        self.held -= count;
        if let Some(last) = front {
            acks.push(if count == 1 {
                Ack::Single(last)
            } else {
                Ack::Multiple(last)
            });
        }
        if self.held > self.max_held {
            let excess: Vec<u64> = self
                .open
                .iter()
                .filter(|(_, d)| d.is_some())
                .map(|(&tag, _)| tag)
                .take(self.held - self.max_held / 2)
                .collect();
            for tag in excess {
                if let Some(Some(delivery)) = self.open.remove(&tag) {
                    self.held -= 1;
                    acks.push(Ack::Single(delivery));
                }
            }
        }
        acks
    }

    /// How many deliveries are finished but not acked yet.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A book with deliveries 1..=n in flight.
    fn delivered(max_held: usize, n: u64) -> AckBook<u64> {
        let mut book = AckBook::new(max_held);
        for tag in 1..=n {
            book.delivered(tag);
        }
        book
    }

    #[test]
    fn in_order_deliveries_are_acked_one_by_one() {
        let mut book = AckBook::new(8);
        book.delivered(1);
        book.delivered(2);
        assert_eq!(book.ready(1, 1), vec![Ack::Single(1)]);
        assert_eq!(book.ready(2, 2), vec![Ack::Single(2)]);
    }

    #[test]
    fn later_deliveries_wait_for_an_earlier_one_then_go_in_one_frame() {
        let mut book = delivered(8, 4);
        assert_eq!(book.ready(3, 3), vec![]);
        assert_eq!(book.ready(2, 2), vec![]);
        assert_eq!((book.held(), book.in_flight()), (2, 2));
        assert_eq!(book.ready(1, 1), vec![Ack::Multiple(3)]);
        assert_eq!(book.held(), 0);
        assert_eq!(book.ready(4, 4), vec![Ack::Single(4)]);
    }

    #[test]
    fn a_multiple_ack_stops_before_a_delivery_in_flight() {
        let mut book = delivered(8, 4);
        assert_eq!(book.ready(2, 2), vec![]);
        assert_eq!(book.ready(4, 4), vec![]);
        assert_eq!(book.ready(1, 1), vec![Ack::Multiple(2)]);
        assert_eq!(book.held(), 1);
        assert_eq!(book.ready(3, 3), vec![Ack::Multiple(4)]);
    }

    #[test]
    fn a_nack_behind_the_front_changes_nothing_before_it() {
        let mut book = delivered(8, 3);
        assert_eq!(book.ready(3, 3), vec![]);
        assert_eq!(book.settled_otherwise(2), vec![]);
        // The requeued message comes back with a new, higher tag, in flight.
        book.delivered(4);
        assert_eq!(book.ready(1, 1), vec![Ack::Multiple(3)]);
        assert_eq!(book.ready(4, 4), vec![Ack::Single(4)]);
    }

    #[test]
    fn with_max_held_one_a_slow_delivery_holds_back_one() {
        let mut book = delivered(1, 3);
        assert_eq!(book.ready(2, 2), vec![]);
        assert_eq!(book.ready(3, 3), vec![Ack::Single(2), Ack::Single(3)]);
        assert_eq!(book.held(), 0);
        assert_eq!(book.ready(1, 1), vec![Ack::Single(1)]);
    }

    #[test]
    fn ready_deliveries_can_be_taken_when_the_session_ends() {
        let mut book = delivered(8, 3);
        assert_eq!(book.ready(3, 3), vec![]);
        assert_eq!(book.take_ready(), vec![3]);
        assert_eq!(book.held(), 0);
    }

    #[test]
    fn a_nacked_delivery_releases_the_ones_behind_it() {
        let mut book = delivered(8, 3);
        assert_eq!(book.ready(2, 2), vec![]);
        assert_eq!(book.ready(3, 3), vec![]);
        assert_eq!(book.settled_otherwise(1), vec![Ack::Multiple(3)]);
        assert_eq!(book.held(), 0);
    }

    #[test]
    fn a_slow_delivery_holds_back_at_most_max_held() {
        let mut book = delivered(4, 10);
        let mut acked = Vec::new();
        for tag in 2..=10 {
            for ack in book.ready(tag, tag) {
                match ack {
                    Ack::Single(d) => acked.push(d),
                    Ack::Multiple(d) => panic!("nothing before 1 may be acked: {d}"),
                }
            }
            assert!(book.held() <= 4, "{} held", book.held());
        }
        assert!(!acked.is_empty());
        // When the slow one finishes, one frame covers the rest (10 is never acked alone:
        // the excess taken is the oldest).
        assert_eq!(book.ready(1, 1), vec![Ack::Multiple(10)]);
        assert_eq!(book.held(), 0);
    }
}
