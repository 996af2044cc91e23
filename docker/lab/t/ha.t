#!/usr/bin/perl
# Edge HA in the lab (docker/lab/run): edge1 and edge2 run keepalived, which gives the edge's
# virtual address to the edge whose nginx answers edge_status, with the higher priority first.
# Under a client's steady load the edge holding the address is killed (docker kill): the other
# takes the address over, and the only connections that fail are those that were in flight
# when it was killed. Then the killed edge starts again and takes the address back. The
# failover figures are written for docker/lab/run to print; they are measured, not asserted.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time sleep);
use Edge::Docker qw(docker docker_ok in_container wait_for);
use Edge::Lab qw(lab_dir vip container holder edge_status probe_start probe_stop probe_wait);

# edge2 may hold the address for a moment at start, until edge1's keepalived starts.
my ($master, $backup) = ('edge1', 'edge2');
wait_for(sub { holder() eq $master }, "$master holding the address", 120);
pass('edge1, the higher priority, holds the address');
wait_for(sub { edge_status($backup) }, "$backup answering edge_status", 60);

probe_start('ha', '--port', '80', '--name', 'a.lab.test', '--workers', '4');
probe_wait('ha', sub { (grep { $_->[2] eq 'ok' } @{$_[0]}) >= 40 }, '40 answers before the kill');

# --- The master is killed.
my $killed = time;
docker_ok('kill', container($master));
my $moved = wait_for(sub { holder() eq $backup && time }, "$backup taking the address over", 60);
probe_wait('ha', sub { (grep { $_->[0] > $moved && $_->[2] eq 'ok' } @{$_[0]}) >= 40 }, '40 answers after the failover');

# --- It starts again and takes the address back (it has the higher priority).
my $restarted = time;
docker_ok('start', container($master));
my $back = wait_for(sub { holder() eq $master && time }, "$master taking the address back", 120);
probe_wait('ha', sub { (grep { $_->[0] > $back && $_->[2] eq 'ok' } @{$_[0]}) >= 40 }, '40 answers after the return');
my $records = probe_stop('ha');

# Failover: the connections that fail are those the killed edge had: in flight at the kill,
# or reaching it while its network went away (refused). Once the backup holds the address,
# every connection is answered; those started in between wait (the client sends its SYN again)
# and are answered too.
my @in_flight = grep { $_->[0] < $killed && $_->[1] > $killed } @$records;
my @failed = grep { $_->[2] ne 'ok' && $_->[0] < $restarted } @$records;
my @failed_late = grep { $_->[0] >= $moved } @failed;
is(scalar @failed_late, 0, "no connection started after $backup took the address failed")
    or diag(explain(\@failed_late));
my ($last_fail) = sort { $b <=> $a } map { $_->[0] } @failed;
my @waited = grep { $_->[0] >= $killed && $_->[0] < $moved && $_->[2] eq 'ok' } @$records;
my ($longest_wait) = sort { $b <=> $a } map { $_->[1] - $_->[0] } @waited;
ok(scalar(grep { $_->[0] >= $moved && $_->[2] eq 'ok' } @$records), 'connections are answered again after the kill');
# What the clients saw: the longest time around the kill without any answer.
my @answers = sort { $a <=> $b } map { $_->[1] } grep { $_->[2] eq 'ok' && $_->[1] < $restarted } @$records;
my ($gap, $gap_from) = (0, 0);
for my $i (1 .. $#answers) {
    next if $answers[$i] < $killed;
    ($gap, $gap_from) = ($answers[$i] - $answers[$i - 1], $answers[$i - 1]) if $answers[$i] - $answers[$i - 1] > $gap;
    last if $answers[$i - 1] > $moved;
}

# The return: the address moves back; the connections in flight on the backup then may fail.
my @returned = grep { $_->[0] >= $restarted } @$records;
my $failed_return = grep { $_->[2] ne 'ok' } @returned;
ok(scalar(grep { $_->[0] > $back && $_->[2] eq 'ok' } @returned) >= 40, "answered through $master again");

my $figures = sprintf(
    "lab: HA: %s killed: the address on %s after %.2f s; no answer to any client for %.2f s (from %.2f s after the kill); "
    . "%d connection(s) in flight at the kill; %d failed, all started within %.3f s of the kill; "
    . "%d started between the kill and the move, answered after waiting up to %.2f s\n"
    . "lab: HA: %s started again: the address back after %.2f s; %d connection(s) since, %d failed\n",
    $master, $backup, $moved - $killed, $gap, $gap_from - $killed, scalar @in_flight,
    scalar @failed, defined $last_fail ? $last_fail - $killed : 0, scalar @waited, $longest_wait // 0,
    $master, $back - $restarted, scalar @returned, $failed_return);
note($figures);
open(my $fh, '>', lab_dir() . '/shared/ha.figures') or die $!;
print $fh $figures;
close $fh;

done_testing;
