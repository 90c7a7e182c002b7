//! How sorted inputs are cut into padded batches.

/// How many of `sorted` (longest first) go into the next padded batch: at most
/// `batch_size` inputs and `max_rows` padded rows, and no more padding than real
/// tokens, so that one long text does not make a batch of short ones slow.
pub(super) fn batch_length(
    sorted: &[usize],
    len_of: impl Fn(usize) -> usize,
    batch_size: usize,
    max_rows: usize,
) -> usize {
    let Some(&first) = sorted.first() else {
        return 0;
    };
    let seq_len = len_of(first);
    let mut real_tokens = seq_len;
    let mut count = 1;
    for &next in &sorted[1..] {
        let padded_rows = (count + 1) * seq_len;
        let tokens = real_tokens + len_of(next);
        if count == batch_size || padded_rows > max_rows || padded_rows > 2 * tokens {
            break;
        }
        real_tokens = tokens;
        count += 1;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::batch_length;

    fn batches(lengths: &[usize], batch_size: usize, max_rows: usize) -> Vec<usize> {
        let order: Vec<usize> = (0..lengths.len()).collect();
        let mut out = Vec::new();
        let mut start = 0;
        while start < order.len() {
            let n = batch_length(&order[start..], |i| lengths[i], batch_size, max_rows);
            out.push(n);
            start += n;
        }
        out
    }

    #[test]
    fn batches_respect_the_batch_size() {
        assert_eq!(batches(&[10; 7], 3, 1000), vec![3, 3, 1]);
    }

    #[test]
    fn batches_respect_the_row_budget() {
        assert_eq!(batches(&[100; 5], 32, 250), vec![2, 2, 1]);
    }

    #[test]
    fn a_long_text_does_not_pad_many_short_ones() {
        assert_eq!(batches(&[256, 10, 10, 10, 10], 32, 10_000), vec![2, 3]);
    }

    #[test]
    fn similar_lengths_share_a_batch() {
        assert_eq!(batches(&[12, 11, 10, 9, 8], 32, 10_000), vec![5]);
    }
}
