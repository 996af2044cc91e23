#!/usr/bin/perl
# The seed's story in the lab (docker/lab/run): pebble, as Let's Encrypt, validates through the
# edge's address; cluster A (three nodes) gets its certificates by HTTP-01 into a webroot its
# nodes share, cluster B by TLS-ALPN-01 that its ingress hands to its ACME client. A host moves
# from A to B by a route-file rewrite and is issued again, without an nginx reload. A node of A
# is stopped under a client's steady load: once the edge's check has marked it down, no
# connection fails.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time sleep);
use Edge::Docker qw(docker docker_ok in_container wait_for);
use Edge::Lab qw(lab_dir addr vip container holder edge_status server_state issue client_https
    client_http certificate_of write_routes probe_start probe_stop probe_wait);

# --- The lab is up: edge1 (the higher priority) holds the address, pebble answers. At start
# edge2 may hold it for a moment, until edge1's keepalived starts (once its nginx answers).
my $edge = 'edge1';
wait_for(sub { holder() eq $edge }, "$edge holding the virtual address", 120);
note("$edge holds " . vip());
wait_for(sub { edge_status($_) } , "$_ edge_status", 60) for qw(edge1 edge2);
wait_for(sub {
    in_container(container('client'), 'sh', '-c',
        'curl -sSk --max-time 5 https://' . addr('pebble') . ':15000/roots/0 > /lab-state/root.pem.tmp'
        . ' && mv /lab-state/root.pem.tmp /lab-state/root.pem');
    $? == 0;
}, "pebble's root", 120);
# Cluster A's servers come from its API server (kube-a): both edges have them before the story.
wait_for(sub { !grep { my $e = $_; grep { server_state($e, 'cluster-a', addr($_)) ne 'up' } qw(a1 a2 a3) } qw(edge1 edge2) },
    "cluster A's nodes up on both edges", 120);
my %started = map { $_ => docker_ok('inspect', '-f', '{{.State.StartedAt}}', container($_)) } qw(edge1 edge2);

# --- Cluster A: HTTP-01 through the edge's Host routing, to any of its three nodes.
for my $name (qw(a.lab.test m.lab.test)) {
    my ($rc, $out) = issue('a-acme', $name, 'http');
    is($rc, 0, "cluster A's ACME client got a certificate for $name by HTTP-01") or diag($out);
}
# Both edges' logs: the validation went through whichever held the address.
sub edge_logs { join '', map { docker('logs', container($_)) } qw(edge1 edge2) }
like(edge_logs(), qr/^\Q${\addr('pebble')}\E .* http a\.lab\.test route=a\.lab\.test upstream=\Q$ENV{LAB_NET}\E\.3[123]:80 .*status=200/m,
    "pebble's validation came from pebble's address and went to a node of cluster A");
my %nodes;
for (1 .. 9) {
    my ($rc, $body) = client_https('a.lab.test');
    $nodes{$1}++ if $rc == 0 && $body =~ /^cluster-a (a\d) tls a\.lab\.test$/;
}
is(join(',', sort keys %nodes), 'a1,a2,a3', 'the client reaches all three nodes by TLS passthrough, verified with the issued certificate');
my ($serial_a, $issuer) = certificate_of('m.lab.test');
like($issuer, qr/^Pebble Intermediate CA/, 'the certificate is pebble\'s');

# --- Cluster B: TLS-ALPN-01 through the edge's SNI routing, the hello passed untouched.
my ($rc, $out) = issue('b-acme', 'b.lab.test', 'tls');
is($rc, 0, "cluster B's ACME client got a certificate for b.lab.test by TLS-ALPN-01") or diag($out);
like(edge_logs(),
    qr/^\Q${\addr('pebble')}\E .* tls b\.lab\.test route=b\.lab\.test upstream=\Q${\addr('b1')}\E:443 alpn=acme-tls\/1 status=200/m,
    'the validation carried ALPN acme-tls/1 and went to cluster B');
($rc, $out) = client_https('b.lab.test');
is($out, "cluster-b b1 tls b.lab.test\n", 'the client reaches cluster B, verified');

# --- m.lab.test moves from cluster A to cluster B: two route files rewritten, no reload.
($rc, $out) = client_http('m.lab.test');
like($out, qr/^cluster-a a\d http m\.lab\.test$/, 'm.lab.test is in cluster A');
write_routes('10-cluster-a.json', 'a', 'a.lab.test');
write_routes('20-cluster-b.json', 'b', 'b.lab.test', 'm.lab.test');
wait_for(sub { (client_http('m.lab.test'))[1] eq "cluster-b b1 http m.lab.test\n" }, 'm.lab.test in cluster B', 60);
pass('after the rewrite, m.lab.test reaches cluster B');
($rc, $out) = issue('b-acme', 'm.lab.test', 'tls');
is($rc, 0, 'cluster B got a certificate for m.lab.test through the edge') or diag($out);
($rc, $out) = client_https('m.lab.test');
is($out, "cluster-b b1 tls m.lab.test\n", 'the client reaches m.lab.test in cluster B, verified');
my ($serial_b) = certificate_of('m.lab.test');
isnt($serial_b, $serial_a, 'with cluster B\'s own certificate');
for my $e (qw(edge1 edge2)) {
    is(docker_ok('inspect', '-f', '{{.State.StartedAt}}', container($e)), $started{$e}, "$e was not restarted");
    unlike(docker('logs', container($e)), qr/signal 1 \(SIGHUP\)|reconfiguring/, "the nginx of $e was not reloaded");
}

# --- A node of cluster A is stopped under steady load.
probe_start('node', '--port', '443', '--tls', '--ca', '/lab-state/root.pem', '--name', 'a.lab.test', '--workers', '4');
probe_wait('node', sub { (grep { $_->[2] eq 'ok' } @{$_[0]}) >= 40 }, '40 answers before the stop');
my $stopped = time;
docker_ok('stop', container('a2'));
wait_for(sub { server_state($edge, 'cluster-a', addr('a2')) eq 'down' }, 'a2 marked down', 60);
my $down = time;
probe_wait('node', sub { (grep { $_->[0] > $down && $_->[2] eq 'ok' } @{$_[0]}) >= 100 }, '100 answers after the mark');
my $records = probe_stop('node');
my @after = grep { $_->[0] > $down } @$records;
my @failed_after = grep { $_->[2] ne 'ok' } @after;
is(scalar @failed_after, 0, 'once a2 is marked down, no connection fails') or diag(explain(\@failed_after));
is(scalar(grep { $_->[3] eq 'cluster-a-a2' } @after), 0, 'and none reaches a2');
my @between = grep { $_->[1] > $stopped && $_->[0] <= $down } @$records;
my $failed_between = grep { $_->[2] ne 'ok' } @between;
my ($slowest) = sort { $b <=> $a } map { $_->[1] - $_->[0] } @between;
my $figures = sprintf("lab: node a2 stopped: marked down after %.1f s; meanwhile %d connection(s), %d failed, slowest %.2f s; "
    . "after: %d connections, %d failed\n", $down - $stopped, scalar @between, $failed_between, $slowest // 0,
    scalar @after, scalar @failed_after);
note($figures);
open(my $fh, '>', lab_dir() . '/shared/story.figures') or die $!;
print $fh $figures;
close $fh;

docker_ok('start', container('a2'));
wait_for(sub { server_state($edge, 'cluster-a', addr('a2')) eq 'up' }, 'a2 up again', 60);
pass('a2 started again is marked up');

done_testing;
