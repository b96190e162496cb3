// The ranking being built, as groups of tied responses, best group first: [[2], [0, 3], [1]]
// says response 2 is best, 0 and 3 tie second, 1 is last. A tie belongs to its cards, not to
// screen positions: moving another card past a tied pair leaves the pair tied.
// Every function returns new groups and leaves its argument as it was.
"use strict";

const Ranking = (() => {
  const copy = (groups) => groups.map((group) => group.slice());

  function where(groups, response) {  // [group index, index in the group]
    for (let g = 0; g < groups.length; g++) {
      const i = groups[g].indexOf(response);
      if (i >= 0) return [g, i];
    }
    throw new Error(`response ${response} is not in the ranking`);
  }

  return {
    // each response alone, in the given order (the order the page shows them first)
    fromOrder: (order) => order.map((response) => [response]),

    // from stored ranks (0 = best, equal = tie); within a tie, in the given order
    fromRanks(ranks, order) {
      const levels = [...new Set(ranks)].sort((a, b) => a - b);
      return levels.map((level) => order.filter((response) => ranks[response] === level));
    },

    flat: (groups) => groups.flat(),

    // ranks[response] = its group's index: 0 = best, tied responses share one
    ranks(groups) {
      const out = [];
      groups.forEach((group, rank) => group.forEach((response) => { out[response] = rank; }));
      return out;
    },

    rankOf: (groups, response) => where(groups, response)[0],

    tiedWithAbove: (groups, response) => where(groups, response)[1] > 0,

    // One step down (+1) or up (-1): a tied response leaves its tie, one rank below or above
    // the others; a response alone trades places with the whole next (or previous) group.
    move(groups, response, step) {
      const out = copy(groups);
      const [g, i] = where(out, response);
      if (out[g].length > 1) {
        out[g].splice(i, 1);
        out.splice(step > 0 ? g + 1 : g, 0, [response]);
        return out;
      }
      const to = g + step;
      if (to < 0 || to >= out.length) return out;
      [out[g], out[to]] = [out[to], out[g]];
      return out;
    },

    // "Tie with the one above", on or off: the first response of a group joins the group
    // above it (its own tie comes along); a response tied with the one above leaves that tie,
    // and the responses after it in the tie stay tied with it.
    toggleTie(groups, response) {
      const out = copy(groups);
      const [g, i] = where(out, response);
      if (i > 0) {
        out.splice(g + 1, 0, out[g].splice(i));
      } else if (g > 0) {
        out[g - 1].push(...out[g]);
        out.splice(g, 1);
      }
      return out;
    },

    // Dropped onto another response's card: alone, just above that response's group when it
    // came from below, just below it when it came from above.
    dropOn(groups, response, target) {
      if (response === target) return copy(groups);
      const flat = groups.flat();
      const down = flat.indexOf(response) < flat.indexOf(target);
      const [g, i] = where(groups, response);
      const out = copy(groups);
      out[g].splice(i, 1);
      const kept = out.filter((group) => group.length);
      const [tg] = where(kept, target);
      kept.splice(down ? tg + 1 : tg, 0, [response]);
      return kept;
    },
  };
})();
