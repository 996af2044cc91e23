#!/usr/bin/perl
# Cluster A's servers come from its API server (the kube-a container): both edges read its
# Nodes (edge_routes_url name=cluster-a discover=nodes), and the route file names the source
# instead of listing addresses. Under a client's steady load through the edges' address:
# `kubectl cordon a2` drains a2 (no failed connection, no new connection to a2 after 1 s, a
# long answer it was sending finishes), a node added to the API server (a4) takes connections
# within 1 s, and a node gone NotReady (a3) takes none after 1 s; both edges follow. The
# figures are written for docker/lab/run to print.

use strict;
use warnings;
use Test::More;
use JSON::PP ();
use Time::HiRes qw(time sleep);
use Edge::Docker qw(docker docker_ok in_container wait_for);
use Edge::Lab qw(lab_dir addr vip container holder edge_status probe_start probe_stop probe_records probe_wait kube);
use Edge::FakeKube;

plan skip_all => 'kubectl is not installed' unless system('kubectl version --client >/dev/null 2>&1') == 0;

my @edges = qw(edge1 edge2);
my $kube = kube();
my $cache = lab_dir() . '/kube-cache';
sub kubectl {
    my $out = `kubectl --cache-dir=$cache @_ 2>&1`;
    is($?, 0, "kubectl @_") or diag $out;
    return $out;
}
# When the API server received the last PATCH of node NAME (what kubectl cordon sends).
sub patched {
    my ($name) = @_;
    my ($r) = reverse grep { $_->[0] eq 'PATCH' && $_->[1] =~ m{^/api/v1/nodes/\Q$name\E(\?|$)} } @{ $kube->requests };
    return $r ? $r->[6] : undef;
}
# Whatever happens below, the lab is left as the next script expects it: no probe running,
# cluster A's nodes a1, a2, a3 Ready and schedulable, a4 not in the API server.
my $restored;
sub restore {
    return if $restored++;
    if (open(my $stop, '>', lab_dir() . '/shared/nodes.stop')) { close $stop }
    $kube->apply(Edge::FakeKube::node($_, addr($_))) for qw(a1 a2 a3);
    eval { $kube->delete(Edge::FakeKube::node('a4', addr('a4'))) };
}
END { restore() unless $restored }
# The servers of cluster-a on an edge: { address => server }.
sub servers_on {
    my ($edge) = @_;
    my $status = edge_status($edge) or return {};
    return { map { ($_->{address} => $_) } @{ $status->{upstreams}{'cluster-a'}{servers} // [] } };
}
# Whether every edge gives every node of %want the state wanted ('up', 'draining'; undef: not
# listed).
sub edges_show {
    my (%want) = @_;
    for my $edge (@edges) {
        my $s = servers_on($edge);
        for my $node (keys %want) {
            my $state = $s->{addr($node)} ? $s->{addr($node)}{state} : undef;
            return 0 if ($state // '-') ne ($want{$node} // '-');
        }
    }
    return 1;
}
my $nodes = sub { join ',', sort map { $_->{metadata}{name} } @{ JSON::PP::decode_json(kubectl('get nodes -o json'))->{items} } };

wait_for(sub { holder() eq 'edge1' }, 'edge1 holding the virtual address', 120);
is($nodes->(), 'a1,a2,a3', "kubectl lists cluster A's three nodes");
wait_for(sub { edges_show(a1 => 'up', a2 => 'up', a3 => 'up', a4 => undef) }, 'both edges with a1, a2, a3 up', 120);
pass("both edges take cluster A's servers from its API server: a1, a2, a3 up");

probe_start('nodes', '--port', '80', '--name', 'a.lab.test', '--workers', '4');
probe_wait('nodes', sub { (grep { $_->[2] eq 'ok' } @{$_[0]}) >= 40 }, '40 answers before the cordon');

# A long answer from a2 (600 KB at 100 KB/s), open through the edge when a2 is cordoned: a
# client asks until one lands on a2.
my $slow;
my $deadline = time + 120;
for (my $try = 1; !$slow && time < $deadline; $try++) {
    my $tag = "/lab-state/slow$try";
    docker_ok('exec', '-d', container('client'), 'sh', '-c',
        "curl -sS --max-time 60 -H 'Host: a.lab.test' -D $tag.head -o /dev/null"
        . " -w '%{http_code} %{size_download}\\n' http://${\vip()}/slow > $tag.tmp 2>&1; mv $tag.tmp $tag.result");
    my $file = lab_dir() . "/shared/slow$try";
    my $node = wait_for(sub {
        my $head = -s "$file.head" ? `cat $file.head` : '';
        return $1 if $head =~ /^X-Node: cluster-a (a\d)\r?$/m;
        return -e "$file.result" ? 'none' : 0;
    }, "slow answer $try", 30);
    $slow = "$file.result" if $node eq 'a2';
}
$slow or BAIL_OUT('no long answer from a2 within 120 s');
pass('a long answer from a2 is under way');

# --- kubectl cordon a2. The times are the API server's: when the PATCH came.
my $since = time - 1;
kubectl('cordon a2');
my $cordon = patched('a2') // die "the API server saw no PATCH of a2\n";
wait_for(sub { edges_show(a2 => 'draining') }, 'a2 draining on both edges', 60);
my $seen_draining = time - $cordon;
ok(!-e $slow, 'the answer from a2 is still under way while a2 drains');
my $active = servers_on('edge1')->{addr('a2')}{active};
probe_wait('nodes', sub { (grep { $_->[0] > $cordon + 1 && $_->[2] eq 'ok' } @{$_[0]}) >= 100 }, '100 answers after the cordon');
wait_for(sub { -e $slow }, 'the long answer from a2 finished', 60);
my $result = `cat $slow`;
is($result, "200 600000\n", 'the answer a2 was sending when cordoned finished whole');
wait_for(sub { edges_show(a2 => 'draining') && !grep { (servers_on($_)->{addr('a2')}{active} // -1) != 0 } @edges },
    'a2 with no connection on either edge', 60);
pass('then a2 has no connection left on either edge (status)');
my $records = probe_records('nodes');
my @late_a2 = grep { $_->[0] > $cordon + 1 && ($_->[3] // '') eq 'cluster-a-a2' } @$records;
is(scalar @late_a2, 0, 'no connection started 1 s after the cordon reaches a2') or diag(explain(\@late_a2));
my ($last_a2) = sort { $b <=> $a } map { $_->[0] } grep { ($_->[3] // '') eq 'cluster-a-a2' } @$records;
my $cordon_took = defined $last_a2 ? $last_a2 - $cordon : 0;
for my $edge (@edges) {
    my @said = grep { /\[notice\] .*upstreams\.cluster-a: server \Q${\addr('a2')}\E is draining \(cordoned\)/ }
        split /\n/, docker('logs', '--since', int($since), container($edge));
    is(scalar @said, 1, "$edge said once that a2 is draining") or diag explain \@said;
}
# What edge2, which does not hold the address, gives a client asking it directly.
my %via_edge2;
for (1 .. 12) {
    my $out = in_container(container('client'), 'curl', '-sS', '--max-time', '10', '-H', 'Host: a.lab.test', 'http://' . addr('edge2') . '/');
    $via_edge2{$1}++ if $out =~ /^cluster-a (a\d) http/;
}
is(join(',', sort keys %via_edge2), 'a1,a3', 'edge2, asked directly, sends to a1 and a3 alone');

# --- a4 joins the cluster.
my $added = time;
$kube->apply(Edge::FakeKube::node('a4', addr('a4')));
my $a4_first = wait_for(sub {
    my ($r) = grep { ($_->[3] // '') eq 'cluster-a-a4' } @{ probe_records('nodes') };
    $r && $r->[0];
}, 'a connection to a4', 60);
my $add_took = $a4_first - $added;
cmp_ok($add_took, '<=', 1, 'a node added to the API server takes connections within 1 s');
wait_for(sub { edges_show(a4 => 'up') }, 'a4 up on both edges', 60);
pass('both edges list a4 up');

# --- a3 goes NotReady.
my $unready = time;
$kube->apply(Edge::FakeKube::node('a3', addr('a3'), ready => 'False'));
wait_for(sub { edges_show(a3 => undef) || edges_show(a3 => 'draining') }, 'a3 out on both edges', 60);
probe_wait('nodes', sub { (grep { $_->[0] > $unready + 1 && $_->[2] eq 'ok' } @{$_[0]}) >= 100 }, '100 answers after a3 went NotReady');
$records = probe_stop('nodes');
my @late_a3 = grep { $_->[0] > $unready + 1 && ($_->[3] // '') eq 'cluster-a-a3' } @$records;
is(scalar @late_a3, 0, 'no connection started 1 s after a3 went NotReady reaches it') or diag(explain(\@late_a3));
my ($last_a3) = sort { $b <=> $a } map { $_->[0] } grep { ($_->[3] // '') eq 'cluster-a-a3' } @$records;
my $unready_took = defined $last_a3 ? $last_a3 - $unready : 0;

my @failed = grep { $_->[2] ne 'ok' } @$records;
is(scalar @failed, 0, 'no connection failed under the cordon, the new node and the NotReady one') or diag(explain(\@failed));
my %by_node;
$by_node{$_->[3]}++ for grep { $_->[2] eq 'ok' } @$records;

my $figures = sprintf("lab: nodes from cluster A's API server: %d connections, %d failed (%s); "
    . "cordon a2: both edges draining after %.2f s, last new connection to a2 %.2f s after, %s open then, finished whole; "
    . "a4 added: first connection after %.2f s; a3 NotReady: last new connection %.2f s after\n",
    scalar @$records, scalar @failed, join(' ', map { "$_ $by_node{$_}" } sort keys %by_node),
    $seen_draining, $cordon_took, defined $active ? "$active connection(s)" : 'no status', $add_took, $unready_took);
note($figures);
open(my $fh, '>', lab_dir() . '/shared/nodes.figures') or die $!;
print $fh $figures;
close $fh;

# --- Back as the other scripts expect cluster A: a1, a2, a3 up, a4 gone.
kubectl('uncordon a2');
restore();
wait_for(sub { edges_show(a1 => 'up', a2 => 'up', a3 => 'up', a4 => undef) }, 'a1, a2, a3 up again, a4 gone', 60);
pass('uncordoned, Ready again and removed: cluster A as it was');

done_testing;
