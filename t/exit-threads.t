#!/usr/bin/perl
# A worker that exits waits for the module's threads still at work. nginx ends a worker with
# exit(), whose handlers (OpenSSL's cleanup, registered with atexit) free what a thread
# hashing a source's file uses: a worker that exited while one did was killed by SIGSEGV.
# Made likely here with a preloaded shim whose SHA256() takes a second, noting when each
# call starts and ends: the worker is told to quit while one is under way. A fast shutdown
# (TERM) waits only half a second, or the master would kill the worker.

use strict;
use warnings;
use POSIX ();
use Test::More;
use Edge::Test qw(http_get wait_for);
use Edge::FakeKube;

my $t = Edge::Test->new;
my $dir = $t->dir;
my $slow_sha = $t->shim('slow-sha', <<'C');
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Read when the shim loads: nginx's workers have another environment. */
static char marks[4096];
static int seconds = 1;
__attribute__((constructor)) static void init(void) {
    const char *m = getenv("EDGE_SLOW_SHA_MARKS");
    if (m && strlen(m) < sizeof marks) strcpy(marks, m);
    const char *s = getenv("EDGE_SLOW_SHA_SECONDS");
    if (s) seconds = atoi(s);
}

static void mark(const char *what) {
    int fd = open(marks, O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (fd < 0) return;
    write(fd, what, strlen(what));
    close(fd);
}

unsigned char *SHA256(const unsigned char *d, size_t n, unsigned char *md) {
    static unsigned char *(*real)(const unsigned char *, size_t, unsigned char *);
    if (!real) real = dlsym(RTLD_NEXT, "SHA256");
    mark("start\n");
    struct timespec pause = { seconds, 0 };
    nanosleep(&pause, NULL);
    unsigned char *r = real(d, n, md);
    mark("end\n");
    return r;
}
C

my ($kube, $doc, $stream) = Edge::FakeKube::one_route_document($t);
$t->config($stream);
# Written by the workers, which may run as another user.
mkdir "$dir/marks.d" or die "mkdir: $!\n";
chmod 0777, "$dir/marks.d";
my $marks = "$dir/marks.d/marks";
{
    local $ENV{LD_PRELOAD} = $slow_sha;
    local $ENV{EDGE_SLOW_SHA_MARKS} = $marks;
    $t->run;
}
my $edge = $t->port('edge');
wait_for(sub { http_get($edge, 'one.test') eq 'a' }, 'the source routes', 60);
my $count = sub { my ($what) = @_; scalar(() = $t->read_file('marks.d/marks') =~ /^$what$/mg) };
# Nothing hashing: the next change starts a hash, and the worker is told to quit during it.
wait_for(sub { $count->('start') == $count->('end') }, 'no hash under way', 60);
my $before = $count->('start');
$doc->('two.test');
wait_for(sub { $count->('start') > $before }, 'a hash of the new document under way', 60);
$t->stop;
is($count->('end'), $count->('start'), 'every hash under way when the worker quit ended before it exited');
my @killed = grep { /exited on signal/ } split /\n/, $t->read_file('error.log');
is_deeply(\@killed, [], 'no worker killed by a signal');

# A fast shutdown (TERM): nginx's master kills a worker that has not exited within a
# few seconds; the worker waits for its threads only half a second then (a hash takes 6 s here).
{
    local $ENV{LD_PRELOAD} = $slow_sha;
    local $ENV{EDGE_SLOW_SHA_MARKS} = $marks;
    local $ENV{EDGE_SLOW_SHA_SECONDS} = 6;
    $t->run;
}
wait_for(sub { http_get($edge, 'two.test') eq 'a' }, 'the source routes again', 60);
wait_for(sub { $count->('start') == $count->('end') }, 'no hash under way', 60);
$before = $count->('start');
$doc->('three.test');
wait_for(sub { $count->('start') > $before }, 'a hash of the next document under way', 60);
my $master = delete $t->{pid};
kill 'TERM', $master;
wait_for(sub { waitpid($master, POSIX::WNOHANG()) == $master }, 'nginx stopped', 30);
@killed = grep { /exited on signal/ } split /\n/, $t->read_file('error.log');
is_deeply(\@killed, [], 'a fast shutdown while a thread hashes: no worker killed by the master');
done_testing;
